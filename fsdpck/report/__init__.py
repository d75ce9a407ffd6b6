"""Rendering: results in, rich renderables, verdict lines and JSON documents out.

Nothing here runs a command or imports torch; each module turns one command's result
(plain dataclasses made by ``fsdpck.commands``) into what a person reads and what a
script parses. One set of facts, two views.
"""
