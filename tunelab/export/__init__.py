"""Ship a result: merge a run into plain weights, quantise, and write a Hugging Face folder or a GGUF file.

tunelab.models.quant   4-bit / 8-bit weight quantisation and fake quantisation (PTQ and QAT)
tunelab.export.hf      merged Hugging Face folder (safetensors, tokenizer, chat template)
tunelab.export.gguf    llama.cpp's GGUF format (llama architecture), written with the `gguf` package
"""
