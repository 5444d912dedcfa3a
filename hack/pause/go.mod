module lepton.local/pause

go 1.22
