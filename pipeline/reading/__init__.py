"""Reading a finished feature cache: by key, by crop, as a torch Dataset or a Ray dataset; previews."""
