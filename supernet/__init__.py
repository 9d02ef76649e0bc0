"""Supernet: model-family adapters, local pruner, ladder, builder, variant store, realisation."""
