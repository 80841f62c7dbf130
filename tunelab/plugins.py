"""The plug-in tables: every tuning method and every stage, by name -> the module that implements it.

This is the one place methods and stages are registered. A module is imported only when its method or
stage is used (`tunelab.methods.get`, `tunelab.stages.get`); the config accepts exactly these names for
`method.name` and `stage`. Adding a method or a stage: write its module, add one line here, add its test
(docs/architecture.md walks through adding a stage). This file imports nothing, so every layer may read it.
"""

METHODS: dict[str, str] = {
    "full": "tunelab.methods.full",
    "lora": "tunelab.methods.lora",
    "freeze": "tunelab.methods.freeze",
    "prefix": "tunelab.methods.prefix",
    "prompt": "tunelab.methods.prompt",
    "gradual": "tunelab.methods.gradual",
    "head": "tunelab.methods.head",
    "adapter": "tunelab.methods.adapter",
    "bitfit": "tunelab.methods.bitfit",
    "ia3": "tunelab.methods.ia3",
    "qlora": "tunelab.methods.qlora",
    "qat": "tunelab.methods.qat",
}

STAGES: dict[str, str] = {
    "sft": "tunelab.stages.lm",
    "pretrain": "tunelab.stages.lm",
    "classification": "tunelab.stages.classification",
    "extractive_qa": "tunelab.stages.extractive_qa",
    "seq2seq": "tunelab.stages.seq2seq",
    "mlm": "tunelab.stages.mlm",
    "ppo": "tunelab.stages.ppo",
    "reward": "tunelab.stages.reward",
    "dpo": "tunelab.stages.dpo",
    "kto": "tunelab.stages.kto",
    "tagging": "tunelab.stages.tagging",
    "distill": "tunelab.stages.distill",
}
