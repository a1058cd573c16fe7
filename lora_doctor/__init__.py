"""lora-doctor: will your LoRA/QLoRA fine-tune fit, learn, and not silently fail?"""

__version__ = "0.1.0"
