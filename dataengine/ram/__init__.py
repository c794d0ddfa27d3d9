"""RAM++ (Recognize Anything Plus), the paper's image tagger, on transformers modules.

`model` holds the network (`RamPlus`, `RamPlusConfig`), `checkpoint` reads the published
`ram_plus_swin_large_14m.pth` (strictly) and writes/reads the safetensors + config conversion,
`tagger` turns images into ranked tags, `files` knows the file names and the bundled tag list.
`python -m dataengine.ram convert CKPT OUT` converts a published checkpoint once, so later loads
never unpickle. This package file imports nothing heavy: config validation uses `files` alone.
"""
