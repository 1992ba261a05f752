"""The captioner's retrieval step: embed each image, search the datastore(s), return the top-k captions.

When the retrieval encoder is the captioning model's own CLIP, the image embedding is computed from the
encoder states the captioner already has (CLS token -> post-layernorm -> projection): one vision forward
pass serves both.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from smallcap.data import dataset_images, image_id_key
from smallcap.errors import SmallCapError
from smallcap.images import load_image
from smallcap.retrieval.datastore import Datastore, MultiDatastore, load_datastores, retrieve_for_training
from smallcap.retrieval.encoders import HFCLIPEncoder, RetrievalEncoder, load_encoder


def shares_vision_tower(encoder: RetrievalEncoder, vision_model: torch.nn.Module | None) -> bool:
    """True when `encoder` is a HF CLIP whose vision tower has exactly the weights of `vision_model`."""
    if vision_model is None or not isinstance(encoder, HFCLIPEncoder):
        return False
    ours, theirs = encoder.model.vision_model.state_dict(), vision_model.state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[key].shape == theirs[key].shape and torch.equal(ours[key].cpu(), theirs[key].cpu()) for key in ours)


class DatastoreRetriever:
    """Retrieve the k most similar captions for images from one datastore or several combined."""

    def __init__(self, store: Datastore | MultiDatastore, encoder: RetrievalEncoder,
                 vision_model: torch.nn.Module | None = None):
        store.check_encoder(encoder)
        self.store = store
        self.encoder = encoder
        self.reuses_encoder_states = shares_vision_tower(encoder, vision_model)

    @classmethod
    def from_directories(cls, directories: Sequence[str], encoder: str | RetrievalEncoder | None = None,
                         vision_model: torch.nn.Module | None = None, device: str = "cpu") -> "DatastoreRetriever":
        """Open datastore directories; the encoder defaults to the one they were built with."""
        store = load_datastores(list(directories))
        if encoder is None or isinstance(encoder, str):
            encoder = load_encoder(encoder or store.encoder_name, device=device)
        return cls(store, encoder, vision_model)

    def embed(self, images: Sequence[Image.Image], encoder_states: torch.Tensor | None = None):
        """Retrieval embeddings of the images, reusing the captioner's encoder states when possible."""
        if self.reuses_encoder_states and encoder_states is not None:
            return self.encoder.image_embeddings_from_states(encoder_states)
        return self.encoder.embed_images(images)

    def __call__(self, images: Sequence[Image.Image], encoder_states: torch.Tensor | None, k: int) -> list[list[str]]:
        return self.store.search(self.embed(images, encoder_states), k).captions


def retrieve_for_dataset(directories: Sequence[str], data: str, out_path: str | None = None, *,
                         split: str | None = None, images_dir: str | None = None, encoder: str | None = None,
                         k: int = 15, keep: int = 7, exclude_own: bool = True, batch_size: int = 256,
                         device: str = "cpu", progress: bool = True,
                         unreadable: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Retrieved captions for every image of a dataset split, in the `{image_id: [captions]}` file `train` reads.

    The images of `split` of `data` (found as `smallcap predict` finds them) are embedded with `encoder`
    (default: the datastores'), and `retrieve_for_training` keeps, of each image's `k` nearest captions, the
    first `keep` not describing the image itself (`exclude_own`). An image that cannot be read raises, or, when
    `unreadable` is given, is left out and recorded there as {image id: reason} while the others go on.
    """
    store = load_datastores(list(directories))
    query_encoder = load_encoder(encoder or store.encoder_name, device=device)
    store.check_encoder(query_encoder)
    images = dataset_images(data, split=split, images_dir=images_dir)
    embeddings, embedded = [np.zeros((0, store.dim), np.float32)], []
    for start in tqdm(range(0, len(images), batch_size), desc="embedding images", unit="batch",
                      disable=not progress or len(images) <= batch_size):
        batch = []
        for image_id, path in images[start:start + batch_size]:
            try:
                batch.append(load_image(path))
            except SmallCapError as error:
                if unreadable is None:
                    raise
                unreadable[image_id_key(image_id)] = str(error)
                continue
            embedded.append(image_id)
        if batch:
            embeddings.append(query_encoder.embed_images(batch, batch_size=batch_size))
    if not embedded:
        raise SmallCapError(f"{data}: none of the {len(images)} images could be read")
    return retrieve_for_training(store, np.concatenate(embeddings), embedded, out_path,
                                 k=k, keep=keep, exclude_own=exclude_own, progress=progress)
