"""Data and benchmark files as people keep them: shared by the data and evaluation stages, importing neither.

`files` turns any supported file (JSON Lines, a JSON array, a JSON object of records keyed by id, Parquet; plain or
gzip/bzip2/xz/zstd compressed) into raw records with their locations; `choice` reads multiple-choice records
(MedQA, MedMCQA, PubMedQA, AfriMed-QA) into one item shape and renders them as ReasonMed-style training records.
"""
