"""Captioner: images -> encoder states -> retrieved captions -> prompt ids -> batched generate -> captions."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from smallcap.errors import MissingExtraError, SmallCapError
from smallcap.hub import DEFAULT_MODEL
from smallcap.generation import GenerationSettings, generate
from smallcap.images import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, VideoOptions, describe, load_image
from smallcap.loading import load_captioner_parts
from smallcap.modeling import SmallCap
from smallcap.prompt import clean_caption, prompt_ids

# A retriever maps a batch of images (and the model's encoder states for them) to retrieved captions.
Retriever = Callable[[Sequence[Image.Image], torch.Tensor, int], list[list[str]]]


@dataclass
class CaptionResult:
    """The caption of one input, the captions that were put in its prompt, or why it failed."""

    image: str
    caption: str | None
    retrieved: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON-friendly form: `{"image", "caption", "retrieved"}` or `{"image", "error"}`."""
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "caption": self.caption, "retrieved": self.retrieved}


class Captioner:
    """Caption images with a SmallCap model, retrieved captions in the prompt, in batches.

    `captioner(images, retrieved=None)` accepts file paths (images or videos), PIL images and arrays. Retrieved captions come
    from `retrieved` (one list per image) when given, else from the attached `retriever` (a datastore); with
    `use_retrieval=False` (default: the model config's `rag`) the prompt has no retrieved captions, and a
    `retrieved` argument is ignored. With `prefetch` (default) the next batch's inputs are read in a background
    thread while the current batch is captioned.
    """

    def __init__(self, model: SmallCap, tokenizer, image_processor, retriever: Retriever | None = None,
                 k: int | None = None, use_retrieval: bool | None = None,
                 settings: GenerationSettings | None = None, video: VideoOptions | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, prefetch: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.retriever = retriever
        self.k = k if k is not None else int(getattr(model.config, "k", 4) or 4)
        self.use_retrieval = bool(getattr(model.config, "rag", True)) if use_retrieval is None else use_retrieval
        self.settings = settings or GenerationSettings()
        self.video = video or VideoOptions()
        self.max_image_pixels = max_image_pixels
        self.prefetch = prefetch
        if self.k < 1:
            raise SmallCapError(f"k (retrieved captions in the prompt) must be at least 1, got {self.k}")
        self.settings.check()
        self._warned_prompt_cap = False

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = DEFAULT_MODEL, *, tokenizer: str | None = None,
                        image_processor: str | None = None, device: str = "cpu",
                        dtype: str | torch.dtype | None = None, quantize: str = "none",
                        datastores: Sequence[str] | None = None, retrieval_encoder: str | None = None,
                        **kwargs) -> "Captioner":
        """Load a SmallCap checkpoint (Hub id, directory or bundled short name) with its tokenizer and image
        processor (`smallcap.loading.load_captioner_parts`: the checkpoint's own, else its base models').

        `dtype` ("float32" (default), "bfloat16", "float16" or a torch dtype) and `quantize` ("none" or "int8":
        the decoder's linear layers, CPU) are the opt-in fast modes of `smallcap.precision`; both may change some
        captions. With `datastores`, captions are retrieved from them (combined) with `retrieval_encoder`
        (default: the encoder the datastores were built with).
        """
        from smallcap.precision import DTYPES, apply_precision, check_precision, dtype_name

        check_precision(device, dtype, quantize)  # before loading anything
        load_dtype = DTYPES[dtype_name(dtype)]
        smallcap, tok, processor = load_captioner_parts(
            model, tokenizer=tokenizer, image_processor=image_processor,
            **({"dtype": load_dtype} if load_dtype != torch.float32 else {}))
        smallcap = apply_precision(smallcap, device, dtype, quantize)
        if datastores:
            from smallcap.retrieval.retriever import DatastoreRetriever

            kwargs["retriever"] = DatastoreRetriever.from_directories(
                datastores, retrieval_encoder, vision_model=smallcap.encoder, device=device)
        return cls(smallcap, tok, processor, **kwargs)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP preprocessing of RGB images into a (n, 3, H, W) tensor."""
        return self.image_processor(images=list(images), return_tensors="pt").pixel_values

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The encoder states the decoder attends to (CLIP's last hidden state, before post-layernorm)."""
        pixels = self.pixel_values(images).to(self.model.device, self.model.dtype)
        return self.model.encoder(pixel_values=pixels).last_hidden_state

    def caption_encoded(self, encoder_states: torch.Tensor, retrieved: Sequence[Sequence[str]] | None) -> list[str]:
        """Captions for precomputed encoder states (e.g. from a feature cache), one per row; `retrieved` is
        ignored when the captioner does not use retrieval."""
        if not self.use_retrieval:
            retrieved = None
        prompts = [self._fitting_prompt(None if retrieved is None else caps)[0]
                   for caps in (retrieved if retrieved is not None else [None] * len(encoder_states))]
        new_ids = generate(self.model, prompts, encoder_hidden_states=encoder_states, settings=self.settings)
        return [clean_caption(self.tokenizer, ids, self.model.config.eos_token_id) for ids in new_ids]

    def context_size(self) -> int | None:
        """The decoder's number of positions (prompt + caption must fit), if the config says."""
        decoder = self.model.config.decoder
        return getattr(decoder, "n_positions", None) or getattr(decoder, "max_position_embeddings", None)

    def prompt_length(self, retrieved: Sequence[str] | None) -> int:
        """The number of prompt tokens for these retrieved captions (as captioning would build the prompt)."""
        return len(self._fitting_prompt(retrieved if self.use_retrieval else None)[0])

    def _fitting_prompt(self, retrieved: Sequence[str] | None) -> tuple[list[int], int]:
        """Prompt ids with up to k retrieved captions, fewer (with a warning, once) when the prompt and
        `max_new_tokens` would not fit the decoder's context; and how many captions it holds."""
        ids = prompt_ids(self.tokenizer, retrieved, self.k)
        used = min(self.k, len(retrieved or []))
        limit = self.context_size()
        if limit is None or len(ids) + self.settings.max_new_tokens <= limit:
            return ids, used
        while used > 1 and len(ids) + self.settings.max_new_tokens > limit:
            used -= 1
            ids = prompt_ids(self.tokenizer, retrieved, used)
        if len(ids) + self.settings.max_new_tokens > limit:
            raise SmallCapError(f"the prompt ({len(ids)} tokens) plus max_new_tokens={self.settings.max_new_tokens} "
                                f"does not fit the model's {limit}-token context; lower --max-new-tokens")
        if not self._warned_prompt_cap:
            print(f"warning: k={self.k} retrieved captions do not fit the model's {limit}-token context with "
                  f"max_new_tokens={self.settings.max_new_tokens}; using the first {used} where needed "
                  "(pass a smaller --k to silence this)", file=sys.stderr)
            self._warned_prompt_cap = True
        return ids, used

    def __call__(self, images: Sequence[ImageInput] | ImageInput, retrieved: Sequence[Sequence[str]] | None = None,
                 batch_size: int = 8, progress: bool = False) -> list[CaptionResult]:
        """Caption `images`; an input that cannot be read gets a result with `error` set, the rest still run."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or getattr(images, "ndim", 0) == 3:
            images = [images]
        return [result for batch in self.iter_batches(images, retrieved, batch_size, progress) for result in batch]

    def iter_batches(self, images: Sequence[ImageInput], retrieved: Sequence[Sequence[str]] | None = None,
                     batch_size: int = 8, progress: bool = False) -> Iterator[list[CaptionResult]]:
        """Caption `images` batch by batch, yielding each batch's results as soon as they are done (so a
        caller can save them before the next batch starts)."""
        if batch_size < 1:
            raise SmallCapError(f"batch size must be at least 1, got {batch_size}")
        if isinstance(images, (str, os.PathLike, Image.Image)) or getattr(images, "ndim", 0) == 3:
            images = [images]
        images = list(images)
        if not self.use_retrieval:
            retrieved = None  # the model's prompt has no retrieved captions, whatever is given
        if retrieved is not None and len(retrieved) != len(images):
            raise SmallCapError(f"got {len(images)} images but {len(retrieved)} lists of retrieved captions")
        if self.use_retrieval and retrieved is None and self.retriever is None:
            raise SmallCapError("this model was trained with retrieved captions in its prompt: give them "
                                "(--retrieved FILE / retrieved=...), attach a datastore (--datastore DIR), "
                                "or disable retrieval (--no-retrieval / use_retrieval=False)")
        if retrieved is not None and self.use_retrieval:
            empty = [describe(source, index) for index, (source, caps) in enumerate(zip(images, retrieved)) if not caps]
            if empty:
                raise SmallCapError(f"empty list of retrieved captions for {', '.join(empty[:3])}"
                                    f"{' ...' if len(empty) > 3 else ''}; the prompt needs at least one "
                                    "(or caption without retrieval: --no-retrieval / use_retrieval=False)")
        bar = tqdm(total=len(images), desc="captioning", unit="image", disable=not progress)
        starts = range(0, len(images), batch_size)
        # The next batch's files are read and decoded (images, video clips) in a background thread while this
        # batch's captions are decoded, so input decoding overlaps the model instead of adding to it.
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smallcap-load")
        try:
            pending = loader.submit(self._load_batch, images, starts[0], batch_size) if starts else None
            for start in starts:
                batch, results, loaded, ok = pending.result()
                if start + batch_size < len(images):
                    pending = loader.submit(self._load_batch, images, start + batch_size, batch_size)
                    if not self.prefetch:
                        pending.result()  # (no overlap: for measuring what the overlap gains)
                if loaded:
                    self._caption_batch(loaded, [results[i] for i in ok],
                                        None if retrieved is None else [retrieved[batch[i][0]] for i in ok])
                bar.update(len(batch))
                yield results
        finally:
            loader.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _load_batch(self, images: Sequence[ImageInput], start: int, batch_size: int):
        """Read the inputs of one batch: (batch entries, results with errors filled in, loaded images, positions
        of the loaded ones). MissingExtraError propagates: it is the environment, not one input."""
        batch = [(index, describe(source, index), source)
                 for index, source in enumerate(images[start:start + batch_size], start)]
        results: list[CaptionResult] = []
        loaded, ok = [], []
        for position, (index, name, source) in enumerate(batch):
            try:
                loaded.append(load_image(source, self.video, max_pixels=self.max_image_pixels))
                ok.append(position)
                results.append(CaptionResult(name, None))
            except MissingExtraError:  # every video would fail alike
                raise
            except SmallCapError as error:
                results.append(CaptionResult(name, None, error=str(error)))
        return batch, results, loaded, ok

    def _caption_batch(self, images: list[Image.Image], results: list[CaptionResult],
                       retrieved: list[Sequence[str]] | None) -> None:
        states = self.encode(images)
        if retrieved is None and self.use_retrieval:
            retrieved = self.retriever(images, states, self.k)
        captions = self.caption_encoded(states, retrieved)
        for index, (result, caption) in enumerate(zip(results, captions)):
            result.caption = caption
            if retrieved is not None:  # the captions the prompt actually held
                result.retrieved = list(retrieved[index][:self._fitting_prompt(retrieved[index])[1]])
