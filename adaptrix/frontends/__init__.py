"""Frontends: adapter files (PEFT, AdapterHub, AIR) -> IR. The only code that reads adapter formats."""
