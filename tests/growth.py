"""Function-preserving growth of a small Llama base: a deeper or a wider model that computes what its
source computes, so an adapter carried onto it by redistribute / project can be checked exactly.
"""
