"""LoRA expert bank, router, stress controller and test-time trainer over a frozen causal LM."""
