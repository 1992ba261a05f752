"""A miniature SmallCap world: synthetic captioned images in two domains, and mini pretrained CLIP and GPT-2.

Pretrained CLIP and GPT-2 are out of reach here and COCO does not fit a 2-core CPU, so this package makes
a world small enough to run the whole SmallCap method on, through the same code paths as real models
(Hugging Face `CLIPModel`, `GPT2LMHeadModel` and their tokenizers):

- `world`: domains of coloured shapes; scenes sampled and drawn from a seed.
- `captions`: five differently worded reference captions per scene.
- `export`: the dataset on disk (PNG images, Karpathy split file, COCO caption annotations).
- `tokenization`: a mini GPT-2 BPE ("!" = 0, "." = 13) and CLIP's BPE cut down to the world's words.
- `clip`, `lm`: the mini CLIP and mini GPT-2, their pretraining and their metrics.
- `build`: all of it in one call (`scripts/build_miniworld.py` on the command line).
"""

from smallcap.miniworld.build import PRESETS, WorldRecipe, build_world, load_world_json, recipe_with
from smallcap.miniworld.export import WorldImage, sample_world, write_world
from smallcap.miniworld.world import DOMAINS

__all__ = ["DOMAINS", "PRESETS", "WorldImage", "WorldRecipe", "build_world", "load_world_json", "recipe_with",
           "sample_world", "write_world"]
