"""Research and demo tools that never deploy: phantom chest X-rays and the offline backbone's pretraining.

They may import ``shared`` and ``client``; nothing in ``shared``, ``client`` or ``server`` imports them.
"""
