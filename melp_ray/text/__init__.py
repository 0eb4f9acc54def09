"""Stage 1, the text side: the WordPiece tokenizer, offline text models, and the masked-language
model that ``python -m melp_ray.pretrain_text`` trains and exports (config, corpus, MLM, export)."""
