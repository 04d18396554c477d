"""`execbox worker`: a Remote Execution API worker (bot) for BuildGrid, every action run by
execbox. Needs `pip install execbox[reapi]`."""
