"""Every adapter input, one module per kind behind one interface (``interface``): our file (``randlora_file``), a
dense delta (``dense``), a PEFT RandLoRA dir (``peft_randlora``), a PEFT LoRA dir (``peft_lora``), a PEFT VeRA dir (``peft_vera``); ``registry``
detects a path's kind (its header read once) and opens it. The PEFT dir reader and its config, target and
parameter rules (``peft_dir``, ``peft_config``, ``peft_targets``, ``peft_params``), adapter keys mapped onto
checkpoint keys (``keymap``) and the per-layer size budget (``budget``) live here too."""
