# Rules of the stats stage.
