"""Clinical text tools shared by data, the judges and evaluation (no judging logic here).

- :mod:`.lexicon`  tokens, word keys, the finding / attribute vocabulary, antonyms, numbers;
- :mod:`.polarity` negation detection and polarity flips of a sentence;
- :mod:`.edits`    character-level minimal edits, sentence spans, word-level edit size;
- :mod:`.frames`   report sentences parsed into findings, negation and attributes.

Kept import-free here: importing one tool does not load the others.
"""
