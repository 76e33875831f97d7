"""The committed zoo's CLIP as study files name it: the runtime's default CLIP is ViT-L-14 (OpenAI's
weights, which tests cannot download), so every test study scored by CLIP names the zoo's explicitly."""

from optimizer.zoo import paths

#: ``scorers:`` options selecting the zoo CLIP and its committed weights
ZOO_CLIP = {"clip_model": "evomerge-digits-clip", "clip_weights": str(paths.clip_file(paths.default_zoo_dir()))}
