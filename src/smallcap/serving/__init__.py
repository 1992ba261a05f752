"""HTTP serving (`smallcap serve`): engine (model + datastores), batcher, request parsing, FastAPI app.

Needs the optional extra `smallcap[serve]`.
"""
