"""icl-gd: do trained transformers learn in context by gradient descent?"""
