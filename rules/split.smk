# Rules of the split stage.
