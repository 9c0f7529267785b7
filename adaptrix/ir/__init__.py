"""The IR: values (sites, roles, ops), their kinds, errors and the registry.

Imports nothing else of adaptrix.
"""
