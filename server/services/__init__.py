"""The use cases behind the front-ends: collections and documents, search, answers, models, health."""
