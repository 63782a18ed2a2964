"""tuneloop's shared layers: what the serving process (``bot``) and the
training process (``trainer``) both stand on.

Each layer imports only from the layers below it (``tests/test_layers.py``
checks it on every run):

    bot.cli, bot.serve                     the commands and the server's life cycle
    bot.adapters  |  trainer               platforms  |  the training process
    bot (core)                             chat, feedback, admin, metrics, replies
    tuneloop.engine                        inference: scheduler, model runner, output (torch)
    tuneloop.learning                      registry, runs, control: no torch
    tuneloop.config, .errors, .store       the bottom: no torch, all of the SQL

``trainer`` never imports ``bot``; ``tuneloop`` imports neither.
"""
