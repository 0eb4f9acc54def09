"""Stage 1: the masked-language text model that ``python -m melp_ray.pretrain_text`` trains
on the report corpus: its config, corpus, WordPiece tokenizer (wordpiece), MLM recipe on the
shared Ray Train + DeepSpeed machinery (recipe) and Hugging Face export."""
