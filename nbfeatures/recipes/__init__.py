"""The scripts that rebuild every zoo folder, each a `python -m nbfeatures.recipes.<script>` command:

    train_model      the base models (tokfsm, stories, counting)       models.py    their shapes, streams and objectives
    train_codebook   codebook models (zoo/<model>/codebooks/<name>)    evaluate.py  the bars the cards record
    train_saes       the stories dictionaries (zoo/stories/saes/<run>)  common.py    the shared command line and card
    train_inversion  InversionView decoders (zoo/<model>/inversion)

Every one trains on the shared loop (`nbfeatures.train.train`) and writes its folder atomically with a card.json.
"""
