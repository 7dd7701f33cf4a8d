-- Nothing starts until require("codevista").setup() is called (see :help codevista).
if vim.g.loaded_codevista then return end
vim.g.loaded_codevista = true
