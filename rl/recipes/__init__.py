"""Recipes built on the loop: domain specialists, distillation, the indexer warm-up."""
