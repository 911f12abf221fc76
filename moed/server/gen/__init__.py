"""Generated from protos/moed/v1 by tools/gen_protos.py. Do not edit."""
