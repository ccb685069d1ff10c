"""Zero-shot classification with CLIP-family backbones: class prompts -> text embeddings ->
scores against the image embeddings already in a feature store (`--method zero-shot`).

    medfm extract --dataset breastmnist --backbone open_clip:hf-hub:org/name    # ?features=embed
    medfm probe --dataset breastmnist --backbone open_clip:hf-hub:org/name --method zero-shot

Modules: `prompts` (templates, class names, the prompts of each task), `text` (the text tower
of an OpenCLIP or Transformers CLIP/SigLIP checkpoint, and the text-embedding cache next to the
store), `classify` (scores from embeddings). The method itself is registered in
medfm.probe.methods.zeroshot. The README's "Zero-shot" section states the method.
"""
