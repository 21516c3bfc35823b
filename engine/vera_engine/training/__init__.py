"""Training and evaluation: the recipe and trainer (`vera-engine train`), the layered dataset and its synthetic
generator (`data`), metrics, held-out evaluation (`vera-engine eval`) and model cards."""
