"""The captioner's retrieval step: embed each image, search the datastore(s), return the top-k captions.

When the retrieval encoder is the captioning model's own CLIP, the image embedding is computed from the
encoder states the captioner already has (CLS token -> post-layernorm -> projection): one vision forward
pass serves both.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from smallcap.retrieval.datastore import Datastore, MultiDatastore, load_datastores
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
