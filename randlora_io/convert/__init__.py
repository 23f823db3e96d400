"""``randlora-io convert``: move an adapter between formats (``run``), losslessly where the math allows and with a
measured error elsewhere: least-squares fit of λ/γ (``fit``), truncated SVD (``lowrank``), and one writer per
output format (``peft_randlora``, ``peft_lora``, ``peft_dir``, ``dense``)."""
