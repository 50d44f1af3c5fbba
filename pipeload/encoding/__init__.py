"""What an encoder needs around its architecture: text batches with padding masks, pooling into
sentence vectors (sentence-transformers' configuration), and image preprocessing.

No model code here (that is pipeload/models/bert.py and vit.py) and no layer loop (the
executor's): these turn user inputs into tensors and hidden states into answers.
"""
