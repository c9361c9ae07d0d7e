"""What the command line runs: the ``hf`` command on a user's Hugging Face model."""
