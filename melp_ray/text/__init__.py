"""The text side: offline text models (models), stage 1's WordPiece tokenizer (wordpiece), and
the masked-language model that ``python -m melp_ray.pretrain_text`` trains: its config, corpus,
MLM recipe and Hugging Face export."""
