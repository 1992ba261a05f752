"""Retrieval: encoders that embed images and captions, and caption datastores searched with them.

- `encoders`: `load_encoder(name)` (HF CLIP id/path, or `open_clip:ARCH[/PRETRAINED]`).
- `datastore`: `Datastore.load(dir).search(embeddings, k)`, `MultiDatastore`, `load_datastores`,
  `retrieve_for_training`.
- `build`: `build_datastore` (resumable) and `import_datastore` (published index + captions).
- `index`: `choose_index`, the one place that picks the FAISS index type.
"""
