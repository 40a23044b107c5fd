# Rules of the merge stage.
