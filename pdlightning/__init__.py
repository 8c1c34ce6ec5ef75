"""pdlightning: planned diffusion language models with PyTorch Lightning.

Pure text and tensor modules (``tags``, ``masks``, ``tokenizer``, ``decoding``)
do not import Lightning; the training side lives in ``pdlightning.model``.
"""

__version__ = "0.1.0"
