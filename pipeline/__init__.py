"""Build, smoke-test and publish llama.cpp server images from a pinned upstream commit.

Stages, each a module: sync -> render -> build -> smoke -> publish. Each stage takes and
returns plain values (dataclasses or JSON files with a schema), so any stage can run alone.
"""
