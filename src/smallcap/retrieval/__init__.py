"""Retrieval: encoders that embed images and captions, and caption datastores searched with them."""
