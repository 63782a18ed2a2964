"""The learning control: model versions, training runs and who may start them.

Torch-free on purpose: the serving process imports it to start runs, follow
the live version and answer admins, and must not load a training stack for
that. The training itself is ``trainer``'s, in its own process.
"""
