"""The learner's guide: the reader's own run explained, stage by stage, as reports/guide/index.html and
reports/guide/guide.pdf, every number read from what the stages wrote (llm/guide/inputs.py).

Chapters 1-3 (corpus, tokenizer, shards) are in data_chapters.py, 4-5 (model, attention step by step) in
model_chapters.py, 6 (attention over training) in evolution_chapter.py, 7 and 8 (training, generation) in
run_chapters.py, 9 (instruction tuning) in sft_chapter.py, 10 (experiments) in experiments_chapter.py;
document.py writes them as HTML and PDF, figures.py draws their figures.
"""
