"""`smallcap train`: train SmallCap's cross-attention on a captioned image collection (`accelerate launch` scales it)."""

from __future__ import annotations

import argparse

from smallcap.cli.options import non_negative_int, positive_float, positive_int
from smallcap.training import TrainingConfig, train

_DEFAULTS = TrainingConfig(data="", output_dir="")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the cross-attention layers (defaults: the paper's recipe)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train SmallCap from cached encoder states (extracted first from the images if needed). "
                    "Run it with `accelerate launch [--num_processes N] -m smallcap train ...` for several devices.")
    parser.add_argument("data", help="caption file: COCO annotations, Karpathy json, .jsonl/.csv/.parquet")
    parser.add_argument("--output-dir", required=True, help="checkpoints, the loss log and (default) the feature cache")
    parser.add_argument("--retrieved", help="retrieved captions per training image, JSON {image_id: [captions]}")
    parser.add_argument("--no-retrieval", action="store_true", help='train without retrieval ("This image shows ")')
    parser.add_argument("--images", help="image root directory (default: guessed from the caption file)")
    parser.add_argument("--split", help="split(s) to train on, comma-separated (default: train[+restval])")
    parser.add_argument("--features", help="encoder-state cache directory (default: OUTPUT_DIR/features)")
    parser.add_argument("--encoder", default=_DEFAULTS.encoder, help="CLIP model (path or Hub id)")
    parser.add_argument("--decoder", default=_DEFAULTS.decoder, help="decoder LM, path or Hub id: GPT-2 (gpt2, gpt2-medium, ...), OPT (facebook/opt-125m, ...) or XGLM (facebook/xglm-564M); the family is read from its config")
    parser.add_argument("--reduce-factor", type=int, default=_DEFAULTS.reduce_factor,
                        help="cross-attention reduce factor r (1, 2, 4, 8, 16)")
    parser.add_argument("--k", type=positive_int, default=_DEFAULTS.k, help="retrieved captions in the prompt")
    parser.add_argument("--sample-k-from-7", action="store_true",
                        help="draw the k prompt captions from the 7 retrieved ones at each step")
    parser.add_argument("--train-decoder", action="store_true", help="also train the whole decoder")
    parser.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs)
    parser.add_argument("--lr", type=positive_float, default=_DEFAULTS.lr, help="AdamW peak learning rate (linear decay to 0)")
    parser.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size,
                        help="samples per optimizer step, over all processes and accumulation steps")
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=_DEFAULTS.gradient_accumulation_steps)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="default: accelerate's configuration (no)")
    parser.add_argument("--save-every-steps", type=positive_int, help="also checkpoint every N optimizer steps")
    parser.add_argument("--resume", nargs="?", const="latest",
                        help="continue from a checkpoint directory (default: the latest in --output-dir)")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="data-loading worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    checkpoint = train(TrainingConfig(
        data=args.data, output_dir=args.output_dir, retrieved=args.retrieved, images=args.images, split=args.split,
        features=args.features, encoder=args.encoder, decoder=args.decoder, reduce_factor=args.reduce_factor,
        k=args.k, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
        train_decoder=args.train_decoder, no_retrieval=args.no_retrieval, sample_k_from_7=args.sample_k_from_7,
        mixed_precision=args.mixed_precision, save_every_steps=args.save_every_steps, resume=args.resume,
        num_workers=args.workers, progress=not args.no_progress))
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(checkpoint)
    return 0
