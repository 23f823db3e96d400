"""One module per foreign format: ``peft_randlora``, ``peft_lora``, ``dense`` (and the shared ``peft_dir`` reader)."""
