"""Minimal peer servers: the same room load, each on its library's idiomatic broadcast.

Every peer speaks the room protocol subset the load generator uses
(``join`` acknowledged with a ``room.joined`` frame, ``message`` relayed
to the other members of the room as the exact text received), so the
peers do less per message than ours (no sequence, no id, no history):
the comparison is against each library's floor, not a full app.
"""
