"""`smallcap caption`: caption images (placeholder until the captioner lands)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("caption", help="caption images with retrieved captions in the prompt")
    parser.set_defaults(func=lambda args: 0)
