"""The model runner: builds the flat batch tensors, runs the model, samples the next tokens."""
