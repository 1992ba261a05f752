"""Captioning and datastore building at scale, as Ray Data jobs (`smallcap predict/datastore build --engine ray`).

- `sources`: the inputs of a job (image folders and globs, WebDataset tar shards, Parquet/CSV tables of paths,
  the annotation files `predict` reads) planned as input shards, one output file each.
- `predict`: read -> decode on CPU tasks -> an actor pool of captioners -> one JSONL file per input shard,
  written atomically, then the merged predictions file; a rerun skips finished shards.
- `datastore`: caption embedding by an actor pool, shard by shard, for `build_datastore`.

Ray itself is the optional extra `smallcap[ray]`; nothing here is imported by the single-machine commands.
"""
