"""The AIR frontend: Adaptrix's portable adapter file -> IR."""
