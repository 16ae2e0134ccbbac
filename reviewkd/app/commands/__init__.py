"""Command handlers: argparse glue that ties the layers together, one module per stage."""
