"""Ship a result: merge a run into plain weights, quantise, and write a Hugging Face folder or a GGUF file.

tunelab.models.quant   4-bit / 8-bit weight quantisation and fake quantisation (PTQ and QAT)
tunelab.export.hf      merged Hugging Face folder (safetensors, tokenizer, chat template)
tunelab.export.gguf    llama.cpp's GGUF format (llama, qwen, gemma, phi3 ... architectures), written with the `gguf` package
tunelab.export.gguf_vocab  the GGUF file's tokenizer: llama.cpp's byte-level BPE or SentencePiece, split as transformers
"""


class ExportError(ValueError):
    """A model or setting that cannot be written as GGUF; the message says why and what to do."""
